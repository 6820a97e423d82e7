# deskcam: no audio. raspberrypi3-64, and so raspberrypi0-2w-64, switches the SoC's
# audio on in config.txt: switch it off (the image has no sound stack either).
do_deploy:append:deskcam-distro() {
    sed -i '/^dtparam=audio=on/d' ${DEPLOYDIR}/${BOOTFILES_DIR_NAME}/config.txt
    echo "dtparam=audio=off" >> ${DEPLOYDIR}/${BOOTFILES_DIR_NAME}/config.txt
}
