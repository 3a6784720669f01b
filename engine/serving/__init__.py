"""Serving jobs: the engine worker thread, its process and pipe to the bot, the queue glue
(runner) and finishing (decode, PNG) off the engine thread."""
