"""exchange-listener: notice replies to sales-sequence mail on Exchange and stop the sequence."""

__version__ = "0.1.0"
