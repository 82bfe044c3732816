"""Evaluation of edited models: CounterFact metrics, GLUE, sequential replay."""
