"""Tasks and data: the FSM task and its analysis, generated and real text."""
