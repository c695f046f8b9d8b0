"""WebSocket URL routes (each consumer checks scope itself)."""

websocket_urlpatterns = []
