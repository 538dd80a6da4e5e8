"""Shared dictionaries (setting `shared`): one store for every state, worker and process."""
