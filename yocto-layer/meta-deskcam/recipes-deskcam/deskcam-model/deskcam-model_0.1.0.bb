# nooelint: oelint.var.mandatoryvar.HOMEPAGE
# (no public home page yet: the source is this repository, see deskcam-source.inc)
SUMMARY = "deskcam's detector models (NanoDet fp32 and int8) in tract's NNEF form"
DESCRIPTION = "models/nanodet.onnx and models/nanodet-int8-qlinear.onnx of the deskcam \
source, checked against their pinned sha256 and converted at build time by the build \
host's deskcam (deskcam-native, which has the ONNX front end): `deskcam model \
export-nnef`. The boards' deskcam is built without the ONNX front end and loads the \
file its board config's model.precision names."
# The weights: Apache-2.0 (RangiLyu/nanodet); the converted package they come from: MIT
# (models/MODEL_CARD.md).
LICENSE = "Apache-2.0 & MIT"
LIC_FILES_CHKSUM = " \
    file://models/LICENSE.human-models;md5=d51d00728953a405e1aae7b4cba5a2b6 \
    file://models/MODEL_CARD.md;beginline=11;endline=11;md5=c9eb9d9e4c533480aeb4b0051ad6066d \
"

DEPENDS += "deskcam-native"

require recipes-deskcam/deskcam/deskcam-source.inc

# The same files on every board (the board config picks one: int8 on the Pi 5).
inherit allarch

B = "${WORKDIR}/build"

do_configure[noexec] = "1"

do_compile() {
    (cd ${S}/models && sha256sum -c nanodet.onnx.sha256 nanodet-int8-qlinear.onnx.sha256)
    for m in nanodet nanodet-int8-qlinear; do
        deskcam model export-nnef ${S}/models/$m.onnx ${B}/$m.nnef.tar
    done
}

# Where the daemon looks for the model of a board whose config says form = "nnef"
# (firmware/daemon/src/model.rs: /usr/share/deskcam/<name>).
do_install() {
    install -d ${D}${datadir}/deskcam
    install -m 0644 ${B}/nanodet.nnef.tar ${D}${datadir}/deskcam/nanodet.nnef.tar
    install -m 0644 ${B}/nanodet-int8-qlinear.nnef.tar ${D}${datadir}/deskcam/nanodet-int8-qlinear.nnef.tar
}

FILES:${PN} += "${datadir}/deskcam/nanodet.nnef.tar"
FILES:${PN} += "${datadir}/deskcam/nanodet-int8-qlinear.nnef.tar"
