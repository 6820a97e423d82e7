# nooelint: oelint.var.mandatoryvar.HOMEPAGE
# (no public home page yet: the source is this repository, see deskcam-source.inc)
SUMMARY = "deskcam: privacy-first desk camera firmware (daemon and management CLI)"
DESCRIPTION = "The deskcam daemon reads frames from a V4L2 camera, runs a detector on \
the device, drives the privacy shutter and the status LED, and publishes only \
violation metadata and redacted stills over MQTT; deskcamctl manages devices over MQTT. \
The native variant (deskcam-native, with the ONNX front end) converts the detector \
model for the boards at build time (deskcam-model)."
LICENSE = "Apache-2.0"
# No LICENSE file at the top of the repository: the workspace's licence line.
LIC_FILES_CHKSUM = "file://Cargo.toml;beginline=9;endline=9;md5=2507bd5f0713f05419cd2f22fa06fe62"

# The v4l crate's bindings come from bindgen, which loads libclang (oe-core's clang;
# no meta-clang).
DEPENDS += "clang-native"

require deskcam-source.inc
# The crates.io packages of Cargo.lock: written by scripts/yocto-crates.
require deskcam-crates.inc

# systemd units (the same files as the SD image; scripts/check-unit checks them),
# installed and enabled. A new unit goes here and into SRC_URI (scripts/check-yocto
# fails on a file of files/ the recipe does not ship).
DESKCAM_UNITS = "deskcam.service deskcam-provision.service"
# Installed, not enabled: started by deskcam-provision.service's OnFailure.
DESKCAM_UNITS_STATIC = "deskcam-fault.service"

SRC_URI += "file://deskcam.service \
            file://deskcam-provision.service \
            file://deskcam-fault.service \
            file://deskcam-tmpfiles.conf \
            file://deskcam.sysusers \
            file://deskcam-gpio.rules"

inherit cargo cargo-update-recipe-crates deploy systemd useradd

# bindgen must read the target's kernel headers: the arguments oe-core's meson class
# hands bindgen. The native build reads the build host's headers.
export LIBCLANG_PATH = "${STAGING_LIBDIR_NATIVE}"
export BINDGEN_EXTRA_CLANG_ARGS = "${HOST_CC_ARCH}${TOOLCHAIN_OPTIONS} --target=${HOST_SYS}"
BINDGEN_EXTRA_CLANG_ARGS:class-native = "-I${STAGING_INCDIR_NATIVE}"

# The workspace's release profile strips; leave that to the packaging (the -dbg
# package, and the already-stripped QA check).
export CARGO_PROFILE_RELEASE_STRIP = "none"

# The board build: both binaries, no embedded demo broker, no ONNX front end (the boards
# load the NNEF model from deskcam-model), the GPIO backends the board configs choose
# from (as scripts/cross-aarch64). The native build: the daemon with the ONNX front
# end, for `deskcam model export-nnef`. `multithread` (inference on several cores)
# costs about 4.5 MB of binary.
DESKCAM_CARGO_PACKAGES = "-p deskcam -p deskcamctl"
DESKCAM_CARGO_PACKAGES:class-native = "-p deskcam"
CARGO_BUILD_FLAGS += "${DESKCAM_CARGO_PACKAGES} --no-default-features"

PACKAGECONFIG ??= "gpiocdev rppal"
PACKAGECONFIG:class-native = "onnx"
PACKAGECONFIG[gpiocdev] = "--features deskcam/gpiocdev"
PACKAGECONFIG[rppal] = "--features deskcam/rppal"
PACKAGECONFIG[multithread] = "--features deskcam/multithread"
PACKAGECONFIG[onnx] = "--features deskcam/onnx"

# The service user: no login, no home; the camera (video) and the GPIO chips (gpio, a
# group this recipe creates; deskcam-gpio.rules gives it the GPIO devices). Made at
# build time (the root file system is read-only) as files/deskcam.sysusers (the SD
# image's) describes it; the image's systemd_sysusers_check compares the two.
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system gpio"
USERADD_PARAM:${PN} = "--system --user-group --groups video,gpio --home-dir /nonexistent \
    --no-create-home --shell ${base_sbindir}/nologin deskcam"

do_install:append:class-target() {
    # Board descriptions (looked up by the config's `board`) and the documented default
    # config, the template of /data/deskcam.toml.
    install -d ${D}${datadir}/deskcam/board-configs
    install -m 0644 ${S}/board-configs/*.toml ${D}${datadir}/deskcam/board-configs/
    install -m 0644 ${S}/firmware/core/default.toml ${D}${datadir}/deskcam/deskcam.toml.example

    install -d ${D}${nonarch_base_libdir}/udev/rules.d
    install -m 0644 ${UNPACKDIR}/deskcam-gpio.rules ${D}${nonarch_base_libdir}/udev/rules.d/60-deskcam-gpio.rules

    if ${@bb.utils.contains('DISTRO_FEATURES', 'systemd', 'true', 'false', d)}; then
        install -d ${D}${systemd_system_unitdir}
        for unit in ${DESKCAM_UNITS} ${DESKCAM_UNITS_STATIC}; do
            install -m 0644 ${UNPACKDIR}/$unit ${D}${systemd_system_unitdir}/
        done
        # /data: the writable partition, handed to the service user at boot.
        install -d ${D}${nonarch_libdir}/tmpfiles.d ${D}${nonarch_libdir}/sysusers.d
        install -m 0644 ${UNPACKDIR}/deskcam-tmpfiles.conf ${D}${nonarch_libdir}/tmpfiles.d/deskcam.conf
        install -m 0644 ${UNPACKDIR}/deskcam.sysusers ${D}${nonarch_libdir}/sysusers.d/deskcam.conf
        # The USB link to the worker's PC (address, DHCP server without router or DNS)
        # and no forwarding: the SD image's files.
        install -d ${D}${sysconfdir}/systemd/network ${D}${sysconfdir}/sysctl.d
        install -m 0644 ${S}/image/rootfs/etc/systemd/network/10-deskcam-usb.network ${D}${sysconfdir}/systemd/network/
        install -m 0644 ${S}/image/rootfs/etc/sysctl.d/60-deskcam.conf ${D}${sysconfdir}/sysctl.d/
    fi
}

# The example config, also beside deskcam.toml on the SD card's boot partition, where
# the user edits it (the image recipe adds it to IMAGE_BOOT_FILES).
do_deploy() {
    install -m 0644 ${S}/firmware/core/default.toml ${DEPLOYDIR}/deskcam.toml.example
}
do_deploy:class-native() {
    :
}
addtask deploy after do_install before do_build

SYSTEMD_SERVICE:${PN} = "${DESKCAM_UNITS}"

FILES:${PN} += "${systemd_system_unitdir}/deskcam-fault.service \
                ${nonarch_libdir}/tmpfiles.d/deskcam.conf \
                ${nonarch_libdir}/sysusers.d/deskcam.conf \
                ${sysconfdir}/systemd/network/10-deskcam-usb.network \
                ${sysconfdir}/sysctl.d/60-deskcam.conf"

# firmware/daemon/src/model.rs and demo.rs compile the source tree's path in (a
# development fallback when looking for the model, board configs and demo frames); with
# the git fetch that path is under TMPDIR. Drop this once the release build leaves
# that fallback out. (With externalsrc, as in the kas builds, the path is outside TMPDIR.)
# nooelint: oelint.vars.insaneskip
INSANE_SKIP:${PN} += "buildpaths"

BBCLASSEXTEND = "native"
