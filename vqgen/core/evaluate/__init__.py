"""Numbers about models and samples: code usage, PSNR and bits (`measures`), and the judge of sample quality,
a small classifier trained on the run's own images, with the Fréchet distance in its features (`quality`).
Imports `runtime`, `store` and `data`.
"""
