"""The user's images: configuration, sources, decoding, splits. Import the submodules directly."""
