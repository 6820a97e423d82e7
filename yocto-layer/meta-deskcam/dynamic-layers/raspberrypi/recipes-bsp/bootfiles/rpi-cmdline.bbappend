# deskcam: the kernel mounts the root file system read-only from the start (the image
# has the read-only-rootfs feature; /data is the writable partition).
CMDLINE_ROOTFS:append:deskcam-distro = " ro"
