"""Runs Metal Shading Language kernels on the CPU, for tests on machines without Apple GPUs."""

from .emulator import BindingError, EmulatedLibrary, EmulatorError, Traffic, compile_library, syntax_check_address_spaces

__all__ = ["BindingError", "EmulatedLibrary", "EmulatorError", "Traffic", "compile_library", "syntax_check_address_spaces"]
