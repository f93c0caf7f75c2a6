"""A running relay: the wiring of its parts, serve and notifier, the pre-fork supervisor and
its worker links, the event loop choice.

May import everything but the command line.
"""
