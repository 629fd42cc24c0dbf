"""Tasks and data: the FSM task and its analysis, generated and real text."""

__all__: list[str] = []  # the modules of this package are the API; nothing is re-exported here
