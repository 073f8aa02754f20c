"""The demo and the fixtures tests and benchmarks build from it — not part of the merge/eval/search stack.

`tiny` builds small Llama checkpoints offline; `skills` teaches two of them one
skill each (the demo's specialists); `study` writes the demo's study file and the
tiny studies tests use; `postgres` makes scratch databases for scale-out tests.
Nothing in `mergetune.merge_ops`, `mergetune.eval` or `mergetune.search` imports it.
"""
