"""Fault injection for tests and demos (`clinfed simulate --inject SITE=KIND`); off unless asked for."""

FAULT_KINDS = ("nan", "corrupt", "wrongshape", "crash")
