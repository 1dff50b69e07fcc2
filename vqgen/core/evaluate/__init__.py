"""Numbers about models and samples: code usage, PSNR and bits (`measures`), and the judge of sample quality,
a small classifier trained on the run's own images, with the Fréchet distance in its features (`quality`),
and what else its features tell (`sample_metrics`: KID, precision/recall, density/coverage, near-copies of
training images, seeds aggregated and settings compared).
Imports `runtime`, `store` and `data`.
"""
