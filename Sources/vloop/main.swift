import VirtualDisk
print(ImageFormat.qcow2)
