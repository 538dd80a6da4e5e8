"""What running the daemon as a service needs: signals, systemd, logs, counters, status."""
