"""Planning a run before it starts: model shape, memory estimate, auto batch size, attention."""
