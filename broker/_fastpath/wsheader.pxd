"""RFC 6455 §5.2 server frame headers, shared by frames.pyx and ringbuf.pyx
(inline C: no call between modules). The pure twins share
``frames_py.frame_header``."""


cdef inline Py_ssize_t _write_header(unsigned char* out, unsigned long long length,
                                     int opcode, bint fin, bint rsv1) noexcept nogil:
    """Write an unmasked header into out (>= 10 bytes); returns its size."""
    cdef int i
    out[0] = <unsigned char>((0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode)
    if length < 126:
        out[1] = <unsigned char>length
        return 2
    if length < 65536:
        out[1] = 126
        out[2] = <unsigned char>(length >> 8)
        out[3] = <unsigned char>length
        return 4
    out[1] = 127
    for i in range(8):
        out[2 + i] = <unsigned char>(length >> (56 - 8 * i))
    return 10


cdef inline Py_ssize_t _header_size(Py_ssize_t length) noexcept nogil:
    if length < 126:
        return 2
    if length < 65536:
        return 4
    return 10
