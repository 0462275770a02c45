"""`safegate report`: exec --log files read (logschema), folded into a night's timeline, drawn as one HTML page."""
