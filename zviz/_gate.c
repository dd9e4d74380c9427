/*
 * zviz/_gate.c: hold a connection's first flight for the host to check.
 *
 * A domains-mode sandbox that connects straight out (its connect answered
 * with a socket of the host's, zviz/_pump.c) must still show the host what
 * it asks for before the server sees it: the TLS ClientHello's server name,
 * or the HTTP request's Host. The socket U is put in a SOCKHASH map whose
 * SK_MSG program redirects every send on U, by any process but this one,
 * into the receive queue of a capture socket K (BPF_F_INGRESS): the bytes
 * wait there, unsent, until the host has read and checked them; the host
 * then sends them on U itself (its own sends pass: the program compares the
 * sender's tgid with ours) and takes U and K out of the map. From then on U
 * is a plain socket: the program runs on nothing after that.
 *
 * The map's key is the connection's addresses as the program sees them in
 * struct sk_msg_md (an SK_MSG program may not call bpf_get_socket_cookie):
 * family, remote and local address, remote port (network order, in the
 * upper half on little-endian) and local port (host order), and a kind:
 * 0 for U itself, 1 for its capture socket. U lives in the host's network
 * namespace, where no two TCP connections share that tuple. A send whose
 * key has no capture socket (already taken out) is dropped by the helper
 * (the sender gets EACCES): nothing passes unchecked.
 *
 * The program is written here as instructions (there is no compiler at
 * run time, and it is 40 of them); the kernel's verifier checks it at load.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "_gate.h"

#ifndef SYS_bpf
#define SYS_bpf 321
#endif

static long
bpf(int cmd, union bpf_attr *attr)
{
    return syscall(SYS_bpf, cmd, attr, sizeof *attr);
}

#define INSN(c, d, s, o, i) ((struct bpf_insn){.code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i)})
#define MOV64_REG(d, s) INSN(BPF_ALU64 | BPF_MOV | BPF_X, d, s, 0, 0)
#define MOV64_IMM(d, i) INSN(BPF_ALU64 | BPF_MOV | BPF_K, d, 0, 0, i)
#define ADD64_IMM(d, i) INSN(BPF_ALU64 | BPF_ADD | BPF_K, d, 0, 0, i)
#define RSH64_IMM(d, i) INSN(BPF_ALU64 | BPF_RSH | BPF_K, d, 0, 0, i)
#define LDX_W(d, s, o) INSN(BPF_LDX | BPF_MEM | BPF_W, d, s, o, 0)
#define STX_W(d, s, o) INSN(BPF_STX | BPF_MEM | BPF_W, d, s, o, 0)
#define ST_W(d, o, i) INSN(BPF_ST | BPF_MEM | BPF_W, d, 0, o, i)
#define JEQ_IMM(d, i, o) INSN(BPF_JMP | BPF_JEQ | BPF_K, d, 0, o, i)
#define JA(o) INSN(BPF_JMP | BPF_JA, 0, 0, o, 0)
#define CALL(f) INSN(BPF_JMP | BPF_CALL, 0, 0, 0, f)
#define EXIT() INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)
#define LD_MAP_FD(d, fd) INSN(BPF_LD | BPF_DW | BPF_IMM, d, BPF_PSEUDO_MAP_FD, 0, fd), INSN(0, 0, 0, 0, 0)

#define MD(field) ((short)offsetof(struct sk_msg_md, field))
#define KEY(field) ((short)(offsetof(struct gate_key, field) - sizeof(struct gate_key)))

int
gate_open(int tgid, int *map_fd, int *prog_fd, char *log, size_t log_size)
{
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.map_type = BPF_MAP_TYPE_SOCKHASH;
    a.key_size = sizeof(struct gate_key);
    a.value_size = sizeof(uint32_t);
    a.max_entries = GATE_MAX_ENTRIES;
    int map = bpf(BPF_MAP_CREATE, &a);
    if (map < 0)
        return -errno;

    struct bpf_insn prog[] = {
        MOV64_REG(BPF_REG_6, BPF_REG_1),                    /* r6 = msg */
        CALL(BPF_FUNC_get_current_pid_tgid),
        RSH64_IMM(BPF_REG_0, 32),                           /* the sender's tgid */
        JEQ_IMM(BPF_REG_0, tgid, 43),                       /* ours: pass (insn 3 -> PASS, insn 47) */
        LDX_W(BPF_REG_2, BPF_REG_6, MD(family)),
        STX_W(BPF_REG_10, BPF_REG_2, KEY(family)),
        JEQ_IMM(BPF_REG_2, AF_INET6, 11),                   /* insn 6 -> V6, insn 18 */
        LDX_W(BPF_REG_2, BPF_REG_6, MD(remote_ip4)),        /* IPv4: the address in word 0, zeros after */
        STX_W(BPF_REG_10, BPF_REG_2, KEY(remote[0])),
        ST_W(BPF_REG_10, KEY(remote[1]), 0),
        ST_W(BPF_REG_10, KEY(remote[2]), 0),
        ST_W(BPF_REG_10, KEY(remote[3]), 0),
        LDX_W(BPF_REG_2, BPF_REG_6, MD(local_ip4)),
        STX_W(BPF_REG_10, BPF_REG_2, KEY(local[0])),
        ST_W(BPF_REG_10, KEY(local[1]), 0),
        ST_W(BPF_REG_10, KEY(local[2]), 0),
        ST_W(BPF_REG_10, KEY(local[3]), 0),
        JA(16),                                             /* insn 17 -> PORTS, insn 34 */
        /* V6 (insn 18): */
        LDX_W(BPF_REG_2, BPF_REG_6, MD(remote_ip6[0])), STX_W(BPF_REG_10, BPF_REG_2, KEY(remote[0])),
        LDX_W(BPF_REG_2, BPF_REG_6, MD(remote_ip6[1])), STX_W(BPF_REG_10, BPF_REG_2, KEY(remote[1])),
        LDX_W(BPF_REG_2, BPF_REG_6, MD(remote_ip6[2])), STX_W(BPF_REG_10, BPF_REG_2, KEY(remote[2])),
        LDX_W(BPF_REG_2, BPF_REG_6, MD(remote_ip6[3])), STX_W(BPF_REG_10, BPF_REG_2, KEY(remote[3])),
        LDX_W(BPF_REG_2, BPF_REG_6, MD(local_ip6[0])), STX_W(BPF_REG_10, BPF_REG_2, KEY(local[0])),
        LDX_W(BPF_REG_2, BPF_REG_6, MD(local_ip6[1])), STX_W(BPF_REG_10, BPF_REG_2, KEY(local[1])),
        LDX_W(BPF_REG_2, BPF_REG_6, MD(local_ip6[2])), STX_W(BPF_REG_10, BPF_REG_2, KEY(local[2])),
        LDX_W(BPF_REG_2, BPF_REG_6, MD(local_ip6[3])), STX_W(BPF_REG_10, BPF_REG_2, KEY(local[3])),
        /* PORTS (insn 34): */
        LDX_W(BPF_REG_2, BPF_REG_6, MD(remote_port)),
        STX_W(BPF_REG_10, BPF_REG_2, KEY(remote_port)),
        LDX_W(BPF_REG_2, BPF_REG_6, MD(local_port)),
        STX_W(BPF_REG_10, BPF_REG_2, KEY(local_port)),
        ST_W(BPF_REG_10, KEY(kind), GATE_CAPTURE),          /* to the capture socket */
        MOV64_REG(BPF_REG_1, BPF_REG_6),
        LD_MAP_FD(BPF_REG_2, map),
        MOV64_REG(BPF_REG_3, BPF_REG_10),
        ADD64_IMM(BPF_REG_3, -(int)sizeof(struct gate_key)),
        MOV64_IMM(BPF_REG_4, BPF_F_INGRESS),
        CALL(BPF_FUNC_msg_redirect_hash),                   /* SK_PASS if redirected, else SK_DROP */
        EXIT(),
        /* PASS (insn 47): */
        MOV64_IMM(BPF_REG_0, SK_PASS),
        EXIT(),
    };
    if (sizeof prog / sizeof prog[0] != 49) { /* the jumps above count on it */
        close(map);
        return -EINVAL;
    }
    memset(&a, 0, sizeof a);
    a.prog_type = BPF_PROG_TYPE_SK_MSG;
    a.insn_cnt = sizeof prog / sizeof prog[0];
    a.insns = (uint64_t)(uintptr_t)prog;
    a.license = (uint64_t)(uintptr_t) "GPL";
    if (log && log_size) {
        log[0] = 0;
        a.log_buf = (uint64_t)(uintptr_t)log;
        a.log_size = (uint32_t)log_size;
        a.log_level = 1;
    }
    int p = bpf(BPF_PROG_LOAD, &a);
    if (p < 0) {
        int e = errno;
        close(map);
        return -e;
    }
    memset(&a, 0, sizeof a);
    a.target_fd = (uint32_t)map;
    a.attach_bpf_fd = (uint32_t)p;
    a.attach_type = BPF_SK_MSG_VERDICT;
    if (bpf(BPF_PROG_ATTACH, &a) < 0) {
        int e = errno;
        close(p);
        close(map);
        return -e;
    }
    *map_fd = map;
    *prog_fd = p;
    return 0;
}

/* The key of TCP socket `up` (kind 0), as the program will build it. */
int
gate_key_of(int up, struct gate_key *key)
{
    struct sockaddr_storage local, remote;
    socklen_t ll = sizeof local, rl = sizeof remote;
    if (getsockname(up, (struct sockaddr *)&local, &ll) || getpeername(up, (struct sockaddr *)&remote, &rl))
        return -errno;
    memset(key, 0, sizeof *key);
    uint16_t rport_be, lport_be;
    if (remote.ss_family == AF_INET && local.ss_family == AF_INET) {
        const struct sockaddr_in *r = (void *)&remote, *l = (void *)&local;
        key->family = AF_INET;
        memcpy(&key->remote[0], &r->sin_addr, 4);
        memcpy(&key->local[0], &l->sin_addr, 4);
        rport_be = r->sin_port;
        lport_be = l->sin_port;
    } else if (remote.ss_family == AF_INET6 && local.ss_family == AF_INET6) {
        const struct sockaddr_in6 *r = (void *)&remote, *l = (void *)&local;
        key->family = AF_INET6;
        memcpy(key->remote, &r->sin6_addr, 16);
        memcpy(key->local, &l->sin6_addr, 16);
        rport_be = r->sin6_port;
        lport_be = l->sin6_port;
    } else {
        return -EAFNOSUPPORT;
    }
    /* sk_msg_md: remote_port is the __be16 in the upper half of a u32 (as
     * the kernel stores skc_dport; read on little-endian), local_port the
     * port in host order */
    uint32_t rp = 0;
    memcpy((char *)&rp + 2, &rport_be, 2);
    key->remote_port = rp;
    key->local_port = ntohs(lport_be);
    key->kind = GATE_SOCKET;
    return 0;
}

static int
update(int map, const struct gate_key *key, int fd)
{
    union bpf_attr a;
    uint32_t value = (uint32_t)fd;
    memset(&a, 0, sizeof a);
    a.map_fd = (uint32_t)map;
    a.key = (uint64_t)(uintptr_t)key;
    a.value = (uint64_t)(uintptr_t)&value;
    a.flags = BPF_NOEXIST;
    return bpf(BPF_MAP_UPDATE_ELEM, &a) < 0 ? -errno : 0;
}

int
gate_add(int map, int up, int capture, struct gate_key *key)
{
    int r = gate_key_of(up, key);
    if (r)
        return r;
    struct gate_key k = *key;
    k.kind = GATE_CAPTURE;
    if ((r = update(map, &k, capture)))
        return r;
    if ((r = update(map, key, up))) {
        gate_remove_one(map, &k);
        return r;
    }
    return 0;
}

int
gate_remove_one(int map, const struct gate_key *key)
{
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.map_fd = (uint32_t)map;
    a.key = (uint64_t)(uintptr_t)key;
    return bpf(BPF_MAP_DELETE_ELEM, &a) < 0 ? -errno : 0;
}
