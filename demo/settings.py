"""The demo's limits and defaults, in one leaf module (it imports nothing) that both the command line
and the app read, so neither has to import the other."""

UPLOAD_LIMIT = "10mb"
QUEUE_SIZE = 64  # waiting requests beyond this are refused with "queue full" instead of piling up
BATCH_SIZE = 16  # uploads merged into one forward pass
