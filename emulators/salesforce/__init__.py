"""A Salesforce REST emulator (token endpoint, SOQL subset, sObject rows) for tests and the demo."""
