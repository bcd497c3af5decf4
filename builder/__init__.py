"""d3m-build: the producer side (teachers, patch scoring, textual inversion, archive building)."""
