# On its own channel to the host (/dev/hvc0, a virtio console): the GPIO lines' levels
# as debugfs shows them (an independent view of the shutter and LED) whenever they
# change, and the few commands the test runs in the guest.
exec 3<>/dev/hvc0
(prev=""; while :; do
  s=$(sed -n 's/.*|\(deskcam-[a-z]*\) *) \(in\|out\) *\([a-z]*\).*/\1=\3/p' /sys/kernel/debug/gpio | tr '\n' ' ')
  [ "$s" = "$prev" ] || echo "PINS $s" >&3
  prev="$s"; sleep 0.1
done) &
# The USB cable to the "PC" (this same VM: vhci_hcd as its host controller, the kernel's
# uvcvideo as its webcam driver), plugged in from power-on: it attaches as soon as the
# box's gadget can connect (the daemon has subscribed to the UVC events). usbip-vudc
# carries control and bulk transfers but no isochronous ones (the kernel's vudc answers
# them with -EXDEV): the PC negotiates and starts streams, but receives no video.
usb_plug() {
  perl -MSocket -e '
    socketpair(my $box, my $pc, AF_UNIX, SOCK_STREAM, 0) or die "socketpair: $!";
    open(my $v, ">", "/sys/devices/platform/usbip-vudc.0/usbip_sockfd") or die "vudc: $!";
    print $v fileno($box); close($v) or die "vudc: $!";
    open(my $h, ">", "/sys/devices/platform/vhci_hcd.0/attach") or die "vhci: $!";
    print $h "0 " . fileno($pc) . " 65538 3"; close($h) or die "vhci: $!";'
}
# The PC's view of the webcam: the uvcvideo capture node.
pc_node() {
  for d in /sys/class/video4linux/video*; do
    case "$(readlink -f "$d/device/driver")" in
      */uvcvideo) [ "$(cat "$d/index")" = 0 ] && { echo "/dev/${d##*/}"; return 0; } ;;
    esac
  done
  return 1
}
# The PC's network interface on the USB link.
pc_if() {
  for d in /sys/class/net/*; do
    case "$(readlink -f "$d/device/driver")" in */cdc_ncm) echo "${d##*/}"; return 0 ;; esac
  done
  return 1
}
# The PC opens a stream (STREAMON on the box) until stopped; run in a subshell, which
# it replaces, so that the subshell's pid is v4l2-ctl's (SIGTERM: a background job
# ignores SIGINT).
pc_stream() {
  exec v4l2-ctl -d "$(pc_node)" --set-fmt-video=width=640,height=480,pixelformat=YUYV \
    --stream-mmap=4 --stream-count=1000000 --stream-to=/dev/null >/dev/null 2>&1
}
# The daemon's USB lines, as they are logged.
journalctl -f -o cat -u deskcam.service | grep --line-buffered "USB:" | sed -u 's/.*USB: /JRNL USB: /' >&3 &
(modprobe vhci-hcd; i=0
 until usb_plug 2>/dev/null || [ $i -ge 1200 ]; do i=$((i+1)); sleep 0.1; done
 until pc_node >/dev/null || [ $i -ge 2400 ]; do i=$((i+1)); sleep 0.1; done
 echo "USB ENUMERATED" >&3
 # The PC's first stream, as a meeting app starting: ten seconds.
 (pc_stream) & p=$!; sleep 10; kill $p; wait $p
 echo "USB FIRST STREAM DONE" >&3
 # The PC's network interface on the same cable (cdc_ncm) gets its address from the box.
 j=0; addr=""
 until [ -n "$addr" ] || [ $j -ge 900 ]; do
   addr=$(networkctl status "$(pc_if)" 2>/dev/null | grep -o '10\.199\.77\.[0-9]*' | grep -vx '10.199.77.1' | head -1)
   j=$((j+1)); sleep 0.1
 done
 # The box's route out through the PC (usb.uplink_via_pc), after its own network's. (The
 # image has no iproute2: the kernel's table, gateway in little-endian hex.)
 usb_default_route() {
   bash -c 'while read -r i d g f r u m rest; do
     [ "$i" = usb0 ] && [ "$d" = 00000000 ] &&
       echo "default_via_$((16#${g:6:2})).$((16#${g:4:2})).$((16#${g:2:2})).$((16#${g:0:2}))_metric_$m"
   done < /proc/net/route' | head -1
 }
 j=0; route=""
 until [ -n "$route" ] || [ $j -ge 100 ]; do route=$(usb_default_route); j=$((j+1)); sleep 0.1; done
 [ -n "$route" ] || { echo "USB DIAG $(networkctl cat 10-deskcam-usb.network 2>&1 | tr '\n' '|')" >&3
   echo "USB DIAG routes $(tr -s ' \t' ' ' < /proc/net/route | tr '\n' '|')" >&3
   echo "USB DIAG $(networkctl status usb0 2>&1 | tr '\n' '|')" >&3
   echo "USB DIAG $(journalctl -u systemd-networkd --no-pager 2>&1 | grep -i 'route\|usb0\|warn\|uplink' | tail -15 | tr '\n' '|')" >&3; }
 echo "USB PCNET ${addr:-none} route=${route:-none} forward=$(cat /proc/sys/net/ipv4/ip_forward)" >&3) &
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
    usb-start) (pc_stream) & echo $! > /tmp/usb-bg.pid ;;
    usb-stop) kill "$(cat /tmp/usb-bg.pid)"; wait "$(cat /tmp/usb-bg.pid)" 2>/dev/null; true ;;
    # The worker's page from the PC (bash's /dev/tcp: the image has no HTTP client).
    page-get) bash -c 'exec 5<>/dev/tcp/10.199.77.1/80 && printf "GET / HTTP/1.0\r\nHost: 10.199.77.1\r\n\r\n" >&5 && cat <&5' \
                > /tmp/page.html && echo "PAGE $(head -1 /tmp/page.html | tr -d '\r') $(grep -c 'Your desk camera' /tmp/page.html)" >&3 ;;
    page-break) bash -c 'exec 5<>/dev/tcp/10.199.77.1/80 && printf "POST /break HTTP/1.0\r\nHost: 10.199.77.1\r\nOrigin: http://10.199.77.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 19\r\n\r\nreason=page+test+01" >&5 && cat <&5' \
                  | head -1 | tr -d '\r' | sed 's/^/PAGE-BREAK /' >&3 ;;
    usb-unplug) echo 0 > /sys/devices/platform/vhci_hcd.0/detach ;;
    # The daemon's peak and current resident memory, in MiB.
    rss) echo "RSS $(awk '/^Vm(HWM|RSS):/ { printf "%s %.1f ", $1, $2 / 1024 }' /proc/$(pidof deskcam)/status)" >&3 ;;
    # What the kernel says of the cable (read when the test fails): the UDC's state, the
    # daemon's threads (where each waits in the kernel), the blocked tasks and the
    # kernel's last lines.
    usb-diag) echo "DIAG udc $(cat /sys/class/udc/*/state 2>&1)" >&3
              for t in /proc/$(pidof deskcam)/task/*; do
                echo "DIAG task $(cat "$t/comm") $(sed -n 's/^State:\t//p' "$t/status") wchan=$(cat "$t/wchan")" >&3
                sed 's/^/DIAG   /' "$t/stack" >&3 2>/dev/null
              done
              echo w > /proc/sysrq-trigger
              dmesg | tail -80 | sed 's/^/DIAG /' >&3 ;;
    *) false ;;
  esac
  echo "DONE $cmd $?" >&3
done
