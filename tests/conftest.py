"""Hooks for every test session."""

from pipeline.run import interrupt_on_termination


def pytest_configure(config):
    # A cancelled CI job may signal pytest itself: SIGTERM then runs the fixtures' finalizers,
    # which stop the QEMU, nginx and dnsmasq they started, as Ctrl-C does.
    interrupt_on_termination()
