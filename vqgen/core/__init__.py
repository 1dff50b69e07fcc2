"""The foundation: everything both stages stand on. It never imports a stage, the pipeline or the CLI."""
