"""The foundation both stages stand on, grouped by concern; it never imports a stage, the run object or the CLI.

    runtime   errors, console, signals, processes          imports nothing of vqgen
    store     the run directory on disk                     runtime
    data      the user's images and the loaders over them   runtime, store
    evaluate  measures and the judge of sample quality      runtime, store, data
    report    the HTML page, its figures, trackers          runtime, store, evaluate
    training  the shared loop and what it keeps             runtime, store, data, evaluate, report
    share     exported models, the Hugging Face Hub         runtime, store, data

Each group's `__init__` says what it owns; tests/test_structure.py checks the imports above.
"""
