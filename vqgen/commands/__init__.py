"""The work behind each `vqgen` command, one module per kind of work: `vqgen.cli` parses the arguments and
imports the command's module only then, so `vqgen --help` never imports torch. Each command checks what it
was given before it loads or writes anything."""
