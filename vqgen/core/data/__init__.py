"""The user's images: the `--data` choice (`config`), where they come from (`sources`, `arrow`, `decode`, the
built-in `shapes`), train and test splits in memory or streamed (`images`), augmentation (`augment`), and the
loaders that serve whole batches (`loaders`). Imports `runtime` and `store`.
"""
