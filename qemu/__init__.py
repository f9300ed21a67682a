"""QEMU boot of the guest image (see vm.py; command line: python3 qemu/boot.py --help)."""
