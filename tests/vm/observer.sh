# On its own channel to the host (/dev/hvc0, a virtio console): the GPIO lines' levels
# as debugfs shows them (an independent view of the shutter and LED) whenever they
# change, and the few commands the test runs in the guest.
exec 3<>/dev/hvc0
(prev=""; while :; do
  s=$(sed -n 's/.*|\(deskcam-[a-z]*\) *) \(in\|out\) *\([a-z]*\).*/\1=\3/p' /sys/kernel/debug/gpio | tr '\n' ' ')
  [ "$s" = "$prev" ] || echo "PINS $s" >&3
  prev="$s"; sleep 0.1
done) &
echo READY >&3
while read -r cmd <&3; do
  case "$cmd" in
    black) v4l2-ctl -d /dev/video0 -c test_pattern=5 -c osd_text_mode=2 ;;
    bars) v4l2-ctl -d /dev/video0 -c test_pattern=0 -c osd_text_mode=0 ;;
    unplug) echo vivid.0 > /sys/bus/platform/drivers/vivid/unbind; i=0
            until rmmod vivid 2>/dev/null || [ $i -ge 100 ]; do i=$((i+1)); sleep 0.2; done
            [ ! -e /sys/module/vivid ] ;;
    plug) modprobe vivid ;;
    reboot) systemctl reboot ;;
    *) false ;;
  esac
  echo "DONE $cmd $?" >&3
done
