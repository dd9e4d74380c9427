/*
 * zviz/_rsys.h: a raw x86_64 system call that touches no memory but its
 * stack and returns -errno (never writes errno). Shared by the spawn path's
 * child (zviz/_stage.c, which runs in its parent's memory) and zviz-init
 * (zviz/_init.c, which has no libc at all).
 */
#ifndef ZVIZ_RSYS_H
#define ZVIZ_RSYS_H
static inline long
rsys_x86_64(long n, long a, long b, long c, long d, long e, long f)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#endif
