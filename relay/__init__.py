"""tunrelay's trio side: TUN device, kernel sockets, analyzer hooks and service."""
