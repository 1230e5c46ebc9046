"""Stages: functions over files. Each reads inputs, writes outputs atomically, then a manifest."""
