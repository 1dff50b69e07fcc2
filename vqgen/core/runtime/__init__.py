"""How a command runs: the errors a user sees (one line, exit code 2), the console only the main process
speaks on, stopping on a signal without damage, and the decisions every process must share.

Owns: `errors` (VQGenError, TrainingStopped), `console` (rich output), `signals` (SIGINT/SIGTERM handling),
`processes` (a value or an error agreed across processes). Imports nothing else of vqgen.
"""
