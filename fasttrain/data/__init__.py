"""Data: sources (file lists), loader backends behind one protocol, generators and checks."""
