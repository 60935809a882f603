"""The model: specs (:mod:`.spec`), sizes (:mod:`.units`) and states (:mod:`.state`).

No I/O happens here. (No eager imports: the CLI must start fast.)
"""
