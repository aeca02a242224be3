"""Producers: records onto the tasks stream(s), from files and SQL; document sync."""
