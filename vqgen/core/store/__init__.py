"""The run directory on disk, and every way a file gets there without being left half-written.

Owns: `layout` (every folder and file name in runs/NAME/), `configs` (config dataclasses as JSON), `weights`
(safetensors + config.json, and the training-state folders), `codes` (the code grids between the stages),
`sample_set` (a `vqgen sample` folder written as it is drawn), `manifest` (checksums), `atomic` (writes through
a temporary file, one-line failures), `lock` (one writer per stage folder), `jsonl` (the metric history),
`imageio` (PNGs), `tensorfile` (a safetensors file written a slice at a time). Imports `runtime` only.
"""
