"""The one training loop both stages share (`loop`), how it is configured (`config`, no torch), the states it
saves and resumes from (`checkpoints`), the best weights and early stopping (`best`), and the set-up and data-
sized defaults around it (`setup`, `sizing`). A stage tells the loop its loss and its held-out metric; the loop
owns the rest. Imports `runtime`, `store`, `data`, `evaluate` and `report`.
"""
