"""Sharing a trained run: the exported folder and finding what `--run` names (`export`), its model card
(`modelcard`) and the Hugging Face Hub (`hub`). Imports `runtime`, `store` and `data`.
"""
