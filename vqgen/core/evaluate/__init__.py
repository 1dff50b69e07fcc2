"""Numbers about models and samples: code usage, PSNR and bits (`measures`), and the judge of sample quality,
a small classifier trained on the run's own images, with the Fréchet distance in its features (`quality`),
what else its features tell (`sample_metrics`: KID, precision/recall, density/coverage, near-copies of
training images), the spread over sampling seeds and settings compared (`seeds`), and the standard
Inception measures through the optional torch-fidelity (`inception`).
Imports `runtime`, `store` and `data`.
"""
