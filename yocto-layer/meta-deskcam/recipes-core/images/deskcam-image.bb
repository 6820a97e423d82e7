SUMMARY = "deskcam device image: read-only, no audio, no login, no SSH"
DESCRIPTION = "A minimal systemd image that runs the deskcam firmware and nothing else \
the device does not need: a read-only root file system with a separate data partition, \
no sound stack, no SSH server and no password that lets anyone log in (root is locked)."
LICENSE = "MIT"

inherit core-image

# Only the features named here: no ssh-server-*, no empty-root-password,
# allow-empty-password, allow-root-login or serial-autologin-root, no package
# management on the device.
IMAGE_FEATURES = "read-only-rootfs"

# No mosquitto: the device talks to the fleet's broker. Wi-Fi when the distro has it;
# the camera (uvcvideo and the V4L2 core) and the USB device controller come with the
# kernel modules.
IMAGE_INSTALL = " \
    packagegroup-core-boot \
    deskcam \
    deskcam-model \
    kernel-modules \
    ${@bb.utils.contains('DISTRO_FEATURES', 'wifi', 'wpa-supplicant', '', d)} \
    ${CORE_IMAGE_EXTRA_INSTALL} \
"

IMAGE_LINGUAS = ""

# The board this image is for (a file of board-configs/), in /etc/default/deskcam
# (DESKCAM_BOARD, read by the provisioning and fault units). Set it for other machines.
DESKCAM_BOARD ??= "${@{ \
    'raspberrypi4-64': 'rpi4-64', \
    'raspberrypi5': 'rpi5', \
    'raspberrypi0-2w-64': 'rpi0-2w-64', \
    'qemuarm64': 'qemu-virt', \
    }.get(d.getVar('MACHINE'), '')}"

# Raspberry Pi SD card: boot (firmware, /boot/firmware), root (read-only), data (/data).
WKS_FILE:rpi = "deskcam-sdimage-raspberrypi.wks"
IMAGE_FSTYPES:rpi = "wic.bz2 wic.bmap"
# The example config beside the one the user writes on the boot partition.
IMAGE_BOOT_FILES:append:rpi = " deskcam.toml.example"
do_image_wic[depends] += "deskcam:do_deploy"

deskcam_rootfs() {
    if [ -z "${DESKCAM_BOARD}" ]; then
        bbfatal "DESKCAM_BOARD is not set for MACHINE ${MACHINE}: name its file in board-configs/"
    fi
    if [ ! -f ${IMAGE_ROOTFS}${datadir}/deskcam/board-configs/${DESKCAM_BOARD}.toml ]; then
        bbfatal "DESKCAM_BOARD ${DESKCAM_BOARD}: no such board in ${datadir}/deskcam/board-configs"
    fi
    install -d ${IMAGE_ROOTFS}${sysconfdir}/default
    printf 'DESKCAM_BOARD=%s\n' "${DESKCAM_BOARD}" > ${IMAGE_ROOTFS}${sysconfdir}/default/deskcam

    # Mount points: the root file system is read-only, so they must exist in it.
    install -d ${IMAGE_ROOTFS}/boot/firmware ${IMAGE_ROOTFS}/data

    # No microphone: neither a USB camera's audio function nor the SoC's audio is bound.
    install -d ${IMAGE_ROOTFS}${sysconfdir}/modprobe.d
    printf '%s\n' \
        '# deskcam: no audio (a USB camera may carry a microphone).' \
        'blacklist snd_usb_audio' \
        'install snd_usb_audio /bin/false' \
        'blacklist snd_bcm2835' \
        > ${IMAGE_ROOTFS}${sysconfdir}/modprobe.d/deskcam-no-audio.conf

    # What this image promises, checked on the result.
    for f in sshd dropbear; do
        if [ -e ${IMAGE_ROOTFS}${sbindir}/$f ]; then
            bbfatal "deskcam-image: an SSH server ($f) is installed"
        fi
    done
    if [ -e ${IMAGE_ROOTFS}${sysconfdir}/shadow ] && grep -q '^root:[^*!:]' ${IMAGE_ROOTFS}${sysconfdir}/shadow; then
        bbfatal "deskcam-image: root has a password"
    fi
    if [ -d ${IMAGE_ROOTFS}${datadir}/alsa ] || [ -e ${IMAGE_ROOTFS}${bindir}/pulseaudio ]; then
        bbfatal "deskcam-image: a sound stack is installed"
    fi
}
# After oe-core's own steps (the root password is zapped by then).
ROOTFS_POSTPROCESS_COMMAND:append = " deskcam_rootfs"
