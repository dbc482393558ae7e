"""Quality filters and PII redaction, one module per published rule set; ``chain`` orders them."""
