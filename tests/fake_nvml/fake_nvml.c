/*
 * fake_nvml.c - a fake libnvidia-ml.so.1 for tests: GPU code runs end to end on a machine without a GPU.
 *
 * Build (tests/fake_nvml.py does this):
 *   gcc -shared -fPIC -Wall -Wextra -O2 -Wl,-soname,libnvidia-ml.so.1 -o DIR/libnvidia-ml.so.1 fake_nvml.c \
 *       -I<nvidia-nvml-dev-cu12>/nvidia/nvml_dev/include      (the real nvml.h: real struct layouts)
 *    or -DFAKE_NVML_OWN_TYPES                                   (no header: the few types are defined below)
 *       [-DOMIT_<function> ...]                                 (leave that symbol out, as an older driver would)
 *
 * State: the text file named by $FAKE_NVML_STATE, re-read on every call (write it atomically). No variable or
 * no file: zero GPUs, and initialisation succeeds. One directive a line, '#' starts a comment, key=value tokens
 * without spaces; '_' in a string value stands for a space ("NVIDIA_A100" reads as "NVIDIA A100").
 *
 *   init_error=<code>        returned by nvmlInit, nvmlInit_v2, nvmlInitWithFlags (default 0)
 *   driver=<version>         nvmlSystemGetDriverVersion (default 550.54.15)
 *   device name=.. uuid=.. total=<bytes> used=<bytes> [reserved=<bytes, 0>] [temp=<C, 40>]
 *          [slowdown=<C, 90; -1 not supported>] [shutdown=<C, 95; -1 not supported>] [mem_ret=<code, 0>]
 *          [mem_v2_ret=<code, mem_ret>] [temp_ret=<code, 0>] [handle_ret=<code, 0>] [procs_ret=<code, 0>]
 *          [mig=<0|1; -1 not supported, 0>] [clocks=<mask, 0>] [clocks_ret=<code, 0>]
 *   proc gpu=<index> pid=<pid> used=<bytes; -1 not available> [kind=compute|graphics]
 *
 * clocks is the clock-event reasons word (nvmlClocksEventReason* bits, decimal or 0x hex) both
 * nvmlDeviceGetCurrentClocksEventReasons and its old name nvmlDeviceGetCurrentClocksThrottleReasons return;
 * clocks_ret is returned by both instead, when not 0.
 *
 * Devices are numbered in file order. A malformed file is reported on stderr and every call then returns
 * NVML_ERROR_UNKNOWN, so a typo in a test cannot pass unnoticed. Like the real library, init is reference
 * counted and device calls before nvmlInit (or after the last nvmlShutdown) return NVML_ERROR_UNINITIALIZED.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef FAKE_NVML_OWN_TYPES
/* Keep the unversioned names (nvmlInit, nvmlDeviceGetCount, ...) as names of their own, declared with their
 * legacy signatures, instead of macros for the _v2/_v3 functions: a real driver exports both. */
#define NVML_NO_UNVERSIONED_FUNC_DEFS
#include <nvml.h>
#define FAKE_NVML_BUILD_INFO "header=nvml.h api=" NVML_API_VERSION_STR
#else
/* Copied from pynvml's ctypes definitions (nvidia-ml-py 13.x), which mirror nvml.h. */
#define FAKE_NVML_BUILD_INFO "header=own-types"
typedef enum nvmlReturn_enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_ALREADY_INITIALIZED = 5,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_INSUFFICIENT_POWER = 8,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_IRQ_ISSUE = 11,
    NVML_ERROR_LIBRARY_NOT_FOUND = 12,
    NVML_ERROR_FUNCTION_NOT_FOUND = 13,
    NVML_ERROR_CORRUPTED_INFOROM = 14,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_RESET_REQUIRED = 16,
    NVML_ERROR_OPERATING_SYSTEM = 17,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
    NVML_ERROR_IN_USE = 19,
    NVML_ERROR_MEMORY = 20,
    NVML_ERROR_NO_DATA = 21,
    NVML_ERROR_VGPU_ECC_NOT_SUPPORTED = 22,
    NVML_ERROR_INSUFFICIENT_RESOURCES = 23,
    NVML_ERROR_FREQ_NOT_SUPPORTED = 24,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_DEPRECATED = 26,
    NVML_ERROR_NOT_READY = 27,
    NVML_ERROR_GPU_NOT_FOUND = 28,
    NVML_ERROR_INVALID_STATE = 29,
    NVML_ERROR_RESET_TYPE_NOT_SUPPORTED = 30,
    NVML_ERROR_UNKNOWN = 999
} nvmlReturn_t;

typedef struct nvmlDevice_st *nvmlDevice_t;

typedef enum nvmlTemperatureSensors_enum {
    NVML_TEMPERATURE_GPU = 0,
    NVML_TEMPERATURE_COUNT
} nvmlTemperatureSensors_t;

typedef enum nvmlTemperatureThresholds_enum {
    NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = 0,
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1,
    NVML_TEMPERATURE_THRESHOLD_MEM_MAX = 2,
    NVML_TEMPERATURE_THRESHOLD_GPU_MAX = 3,
    NVML_TEMPERATURE_THRESHOLD_ACOUSTIC_MIN = 4,
    NVML_TEMPERATURE_THRESHOLD_ACOUSTIC_CURR = 5,
    NVML_TEMPERATURE_THRESHOLD_ACOUSTIC_MAX = 6,
    NVML_TEMPERATURE_THRESHOLD_GPS_CURR = 7,
    NVML_TEMPERATURE_THRESHOLD_COUNT
} nvmlTemperatureThresholds_t;

typedef struct nvmlMemory_st {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct nvmlMemory_v2_st {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

typedef struct nvmlProcessInfo_v1_st {
    unsigned int pid;
    unsigned long long usedGpuMemory;
} nvmlProcessInfo_v1_t;

typedef struct nvmlProcessInfo_v2_st {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_v2_t, nvmlProcessInfo_t;

typedef struct {
    unsigned int version;
    nvmlTemperatureSensors_t sensorType;
    int temperature;
} nvmlTemperature_v1_t;
typedef nvmlTemperature_v1_t nvmlTemperature_t;

#define NVML_STRUCT_VERSION(data, ver) (unsigned int)(sizeof(nvml##data##_v##ver##_t) | (ver << 24U))
#define nvmlMemory_v2 NVML_STRUCT_VERSION(Memory, 2)
#define nvmlTemperature_v1 NVML_STRUCT_VERSION(Temperature, 1)
#define NVML_VALUE_NOT_AVAILABLE (-1)
#define NVML_DEVICE_NAME_V2_BUFFER_SIZE 96
#define NVML_DEVICE_UUID_V2_BUFFER_SIZE 96
#define NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE 80

/* nvml.h's prototypes for the functions defined below (the legacy unversioned ones as declared under
 * NVML_NO_UNVERSIONED_FUNC_DEFS), so both builds check the same signatures. */
nvmlReturn_t nvmlInit(void);
nvmlReturn_t nvmlInit_v2(void);
nvmlReturn_t nvmlInitWithFlags(unsigned int flags);
nvmlReturn_t nvmlShutdown(void);
const char *nvmlErrorString(nvmlReturn_t result);
nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length);
nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount);
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount);
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device);
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device);
nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index);
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length);
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length);
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory);
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory);
nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensorType, unsigned int *temp);
nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t device, nvmlTemperature_t *temperature);
nvmlReturn_t nvmlDeviceGetTemperatureThreshold(nvmlDevice_t device, nvmlTemperatureThresholds_t thresholdType,
                                               unsigned int *temp);
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device, unsigned int *infoCount,
                                                  nvmlProcessInfo_v1_t *infos);
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_v2_t *infos);
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos);
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses(nvmlDevice_t device, unsigned int *infoCount,
                                                   nvmlProcessInfo_v1_t *infos);
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(nvmlDevice_t device, unsigned int *infoCount,
                                                      nvmlProcessInfo_v2_t *infos);
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                      nvmlProcessInfo_t *infos);
nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode, unsigned int *pendingMode);
nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device, unsigned long long *clocksEventReasons);
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device, unsigned long long *clocksThrottleReasons);
#endif /* FAKE_NVML_OWN_TYPES */

/* The layouts pynvml's ctypes Structures assume (and the version words it passes), checked in both builds. */
_Static_assert(sizeof(nvmlMemory_t) == 24, "nvmlMemory_t");
_Static_assert(sizeof(nvmlMemory_v2_t) == 40, "nvmlMemory_v2_t");
_Static_assert(nvmlMemory_v2 == 0x02000028u, "pynvml passes nvmlMemory_v2 = 0x02000028");
_Static_assert(sizeof(nvmlTemperature_v1_t) == 12, "nvmlTemperature_v1_t");
_Static_assert(nvmlTemperature_v1 == 0x0100000Cu, "pynvml passes nvmlTemperature_v1 = 0x100000C");
_Static_assert(sizeof(nvmlProcessInfo_v1_t) == 16, "nvmlProcessInfo_v1_t");
_Static_assert(sizeof(nvmlProcessInfo_v2_t) == 24, "nvmlProcessInfo_v2_t (also _v3's nvmlProcessInfo_t)");
_Static_assert(sizeof(nvmlProcessInfo_t) == 24, "nvmlProcessInfo_t");

#define FAKE_MAX_DEVICES 16
#define FAKE_MAX_PROCS 256
#define FAKE_LINE_MAX 1024
#define FAKE_DEFAULT_DRIVER "550.54.15"
#define FAKE_NO_INSTANCE 0xFFFFFFFFu /* gpuInstanceId / computeInstanceId outside MIG */

typedef struct {
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE];
    char uuid[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    unsigned long long total, used, reserved;
    long long temp, slowdown, shutdown, mig;
    long long mem_ret, mem_v2_ret, temp_ret, handle_ret, procs_ret;
    unsigned long long clocks; /* clock-event reasons */
    long long clocks_ret;
} fake_device;

typedef struct {
    unsigned int gpu;
    unsigned int pid;
    unsigned long long used; /* ULLONG_MAX: not available */
    int graphics;
} fake_proc;

typedef struct {
    long long init_error;
    char driver[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE];
    unsigned int ndev;
    fake_device dev[FAKE_MAX_DEVICES];
    unsigned int nproc;
    fake_proc proc[FAKE_MAX_PROCS];
} fake_state;

/* A handle points at one of these; it names an index, looked up in the state current at each call. */
struct nvmlDevice_st {
    unsigned int index;
};

static fake_state g_state;
static struct nvmlDevice_st g_handles[FAKE_MAX_DEVICES];
static unsigned int g_init_count;

/* ---------------------------------------------------------------------------------------------------------- */
/* State file parsing                                                                                           */

static const char *g_path;
static unsigned int g_lineno;

static int parse_error(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "fake_nvml: %s:%u: ", g_path, g_lineno);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return -1;
}

static int parse_ull(const char *key, const char *s, unsigned long long *out)
{
    char *end;
    unsigned long long v;
    if (*s < '0' || *s > '9')
        return parse_error("%s=%s: expected a non-negative integer", key, s);
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0')
        return parse_error("%s=%s: expected a non-negative integer", key, s);
    *out = v;
    return 0;
}

/* An unsigned 64-bit word, decimal or 0x hex (a bit mask). */
static int parse_mask(const char *key, const char *s, unsigned long long *out)
{
    char *end;
    unsigned long long v;
    if (*s < '0' || *s > '9')
        return parse_error("%s=%s: expected a non-negative integer (decimal or 0x hex)", key, s);
    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno != 0 || *end != '\0')
        return parse_error("%s=%s: expected a non-negative integer (decimal or 0x hex)", key, s);
    *out = v;
    return 0;
}

static int parse_ll(const char *key, const char *s, long long lo, long long hi, long long *out)
{
    char *end;
    long long v;
    if (*s == '\0')
        return parse_error("%s=: expected an integer", key);
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < lo || v > hi)
        return parse_error("%s=%s: expected an integer in [%lld, %lld]", key, s, lo, hi);
    *out = v;
    return 0;
}

/* A string value: '_' stands for a space. */
static int parse_text(const char *key, const char *s, char *out, size_t size)
{
    size_t i, n = strlen(s);
    if (n >= size)
        return parse_error("%s: longer than %zu characters", key, size - 1);
    for (i = 0; i < n; i++)
        out[i] = s[i] == '_' ? ' ' : s[i];
    out[n] = '\0';
    return 0;
}

/* Splits "key=value" in place; -1 when there is no '='. */
static int split_token(char *tok, char **key, char **value)
{
    char *eq = strchr(tok, '=');
    if (eq == NULL)
        return parse_error("'%s': expected key=value", tok);
    *eq = '\0';
    *key = tok;
    *value = eq + 1;
    return 0;
}

#define RET_MAX 0x7fffffffLL /* return codes are nvmlReturn_t values */
#define TEMP_MAX 100000LL

static int parse_global(char *tok)
{
    char *key = NULL, *value = NULL;
    if (split_token(tok, &key, &value) != 0)
        return -1;
    if (strcmp(key, "init_error") == 0)
        return parse_ll(key, value, 0, RET_MAX, &g_state.init_error);
    if (strcmp(key, "driver") == 0)
        return parse_text(key, value, g_state.driver, sizeof g_state.driver);
    return parse_error("unknown setting '%s'", key);
}

static int parse_device(char **save)
{
    fake_device *d;
    char *tok, *key = NULL, *value = NULL;
    int have_name = 0, have_uuid = 0, have_total = 0, have_used = 0, have_v2 = 0;
    int rc = 0;

    if (g_state.ndev >= FAKE_MAX_DEVICES)
        return parse_error("more than %d devices", FAKE_MAX_DEVICES);
    d = &g_state.dev[g_state.ndev];
    memset(d, 0, sizeof *d);
    d->temp = 40;
    d->slowdown = 90;
    d->shutdown = 95;

    while (rc == 0 && (tok = strtok_r(NULL, " \t\r\n", save)) != NULL) {
        if (split_token(tok, &key, &value) != 0)
            return -1;
        if (strcmp(key, "name") == 0) {
            rc = parse_text(key, value, d->name, sizeof d->name);
            have_name = 1;
        } else if (strcmp(key, "uuid") == 0) {
            rc = parse_text(key, value, d->uuid, sizeof d->uuid);
            have_uuid = 1;
        } else if (strcmp(key, "total") == 0) {
            rc = parse_ull(key, value, &d->total);
            have_total = 1;
        } else if (strcmp(key, "used") == 0) {
            rc = parse_ull(key, value, &d->used);
            have_used = 1;
        } else if (strcmp(key, "reserved") == 0) {
            rc = parse_ull(key, value, &d->reserved);
        } else if (strcmp(key, "temp") == 0) {
            rc = parse_ll(key, value, 0, TEMP_MAX, &d->temp);
        } else if (strcmp(key, "slowdown") == 0) {
            rc = parse_ll(key, value, -1, TEMP_MAX, &d->slowdown);
        } else if (strcmp(key, "shutdown") == 0) {
            rc = parse_ll(key, value, -1, TEMP_MAX, &d->shutdown);
        } else if (strcmp(key, "mem_ret") == 0) {
            rc = parse_ll(key, value, 0, RET_MAX, &d->mem_ret);
        } else if (strcmp(key, "mem_v2_ret") == 0) {
            rc = parse_ll(key, value, 0, RET_MAX, &d->mem_v2_ret);
            have_v2 = 1;
        } else if (strcmp(key, "temp_ret") == 0) {
            rc = parse_ll(key, value, 0, RET_MAX, &d->temp_ret);
        } else if (strcmp(key, "handle_ret") == 0) {
            rc = parse_ll(key, value, 0, RET_MAX, &d->handle_ret);
        } else if (strcmp(key, "procs_ret") == 0) {
            rc = parse_ll(key, value, 0, RET_MAX, &d->procs_ret);
        } else if (strcmp(key, "mig") == 0) {
            rc = parse_ll(key, value, -1, 1, &d->mig);
        } else if (strcmp(key, "clocks") == 0) {
            rc = parse_mask(key, value, &d->clocks);
        } else if (strcmp(key, "clocks_ret") == 0) {
            rc = parse_ll(key, value, 0, RET_MAX, &d->clocks_ret);
        } else {
            return parse_error("device: unknown key '%s'", key);
        }
    }
    if (rc != 0)
        return -1;
    if (!have_name || !have_uuid || !have_total || !have_used)
        return parse_error("device: name, uuid, total and used are required");
    if (d->used > d->total || d->reserved > d->total - d->used)
        return parse_error("device: used + reserved exceeds total");
    if (!have_v2)
        d->mem_v2_ret = d->mem_ret;
    g_state.ndev++;
    return 0;
}

static int parse_proc(char **save)
{
    fake_proc *p;
    char *tok, *key = NULL, *value = NULL;
    long long n = 0;
    int have_gpu = 0, have_pid = 0, have_used = 0;

    if (g_state.nproc >= FAKE_MAX_PROCS)
        return parse_error("more than %d processes", FAKE_MAX_PROCS);
    p = &g_state.proc[g_state.nproc];
    memset(p, 0, sizeof *p);

    while ((tok = strtok_r(NULL, " \t\r\n", save)) != NULL) {
        if (split_token(tok, &key, &value) != 0)
            return -1;
        if (strcmp(key, "gpu") == 0) {
            if (parse_ll(key, value, 0, FAKE_MAX_DEVICES - 1, &n) != 0)
                return -1;
            p->gpu = (unsigned int)n;
            have_gpu = 1;
        } else if (strcmp(key, "pid") == 0) {
            if (parse_ll(key, value, 0, 0xFFFFFFFFLL, &n) != 0)
                return -1;
            p->pid = (unsigned int)n;
            have_pid = 1;
        } else if (strcmp(key, "used") == 0) {
            if (strcmp(value, "-1") == 0)
                p->used = (unsigned long long)NVML_VALUE_NOT_AVAILABLE;
            else if (parse_ull(key, value, &p->used) != 0)
                return -1;
            have_used = 1;
        } else if (strcmp(key, "kind") == 0) {
            if (strcmp(value, "compute") == 0)
                p->graphics = 0;
            else if (strcmp(value, "graphics") == 0)
                p->graphics = 1;
            else
                return parse_error("proc: kind=%s: expected compute or graphics", value);
        } else {
            return parse_error("proc: unknown key '%s'", key);
        }
    }
    if (!have_gpu || !have_pid || !have_used)
        return parse_error("proc: gpu, pid and used are required");
    g_state.nproc++;
    return 0;
}

static int parse_line(char *line)
{
    char *save = NULL, *tok, *hash = strchr(line, '#');
    if (hash != NULL)
        *hash = '\0';
    tok = strtok_r(line, " \t\r\n", &save);
    if (tok == NULL)
        return 0;
    if (strcmp(tok, "device") == 0)
        return parse_device(&save);
    if (strcmp(tok, "proc") == 0)
        return parse_proc(&save);
    if (strchr(tok, '=') == NULL)
        return parse_error("unknown directive '%s'", tok);
    do {
        if (parse_global(tok) != 0)
            return -1;
    } while ((tok = strtok_r(NULL, " \t\r\n", &save)) != NULL);
    return 0;
}

/* Re-reads $FAKE_NVML_STATE into g_state: NVML_SUCCESS, or NVML_ERROR_UNKNOWN for a bad file. */
static nvmlReturn_t load_state(void)
{
    char line[FAKE_LINE_MAX];
    FILE *f;
    int bad = 0;
    unsigned int i;

    memset(&g_state, 0, sizeof g_state);
    strcpy(g_state.driver, FAKE_DEFAULT_DRIVER);
    g_path = getenv("FAKE_NVML_STATE");
    g_lineno = 0;
    if (g_path == NULL || g_path[0] == '\0')
        return NVML_SUCCESS;
    f = fopen(g_path, "r");
    if (f == NULL) {
        if (errno == ENOENT)
            return NVML_SUCCESS;
        parse_error("cannot open: %s", strerror(errno));
        return NVML_ERROR_UNKNOWN;
    }
    while (!bad && fgets(line, sizeof line, f) != NULL) {
        g_lineno++;
        if (strchr(line, '\n') == NULL && !feof(f)) {
            parse_error("line longer than %d characters", FAKE_LINE_MAX - 2);
            bad = 1;
        } else if (parse_line(line) != 0) {
            bad = 1;
        }
    }
    if (!bad && ferror(f)) {
        parse_error("read error: %s", strerror(errno));
        bad = 1;
    }
    fclose(f);
    for (i = 0; !bad && i < g_state.nproc; i++) {
        if (g_state.proc[i].gpu >= g_state.ndev) {
            g_lineno = 0;
            parse_error("proc pid=%u: no device %u", g_state.proc[i].pid, g_state.proc[i].gpu);
            bad = 1;
        }
    }
    if (bad) {
        memset(&g_state, 0, sizeof g_state);
        return NVML_ERROR_UNKNOWN;
    }
    return NVML_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Helpers                                                                                                      */

/* Library initialised and state readable. */
static nvmlReturn_t begin(void)
{
    if (g_init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    return load_state();
}

/* begin(), and the device a handle names (NVML_ERROR_INVALID_ARGUMENT for anything else). */
static nvmlReturn_t begin_device(nvmlDevice_t device, const fake_device **out, unsigned int *index)
{
    uintptr_t p = (uintptr_t)device, base = (uintptr_t)g_handles;
    unsigned int i;
    nvmlReturn_t rc = begin();
    if (rc != NVML_SUCCESS)
        return rc;
    if (p < base || p >= base + sizeof g_handles || (p - base) % sizeof g_handles[0] != 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    i = (unsigned int)((p - base) / sizeof g_handles[0]);
    if (i >= g_state.ndev)
        return NVML_ERROR_INVALID_ARGUMENT;
    *out = &g_state.dev[i];
    if (index != NULL)
        *index = i;
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_text(const char *src, char *dst, unsigned int length)
{
    size_t n = strlen(src);
    if (dst == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (n + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, n + 1);
    return NVML_SUCCESS;
}

static nvmlReturn_t init_common(void)
{
    nvmlReturn_t rc = load_state();
    if (rc != NVML_SUCCESS)
        return rc;
    if (g_state.init_error != 0)
        return (nvmlReturn_t)g_state.init_error;
    g_init_count++;
    return NVML_SUCCESS;
}

static nvmlReturn_t count_common(unsigned int *deviceCount)
{
    nvmlReturn_t rc = begin();
    if (rc != NVML_SUCCESS)
        return rc;
    if (deviceCount == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *deviceCount = g_state.ndev;
    return NVML_SUCCESS;
}

static nvmlReturn_t handle_common(unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t rc = begin();
    if (rc != NVML_SUCCESS)
        return rc;
    if (device == NULL || index >= g_state.ndev)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (g_state.dev[index].handle_ret != 0)
        return (nvmlReturn_t)g_state.dev[index].handle_ret;
    g_handles[index].index = index;
    *device = &g_handles[index];
    return NVML_SUCCESS;
}

/* The two-call protocol of nvmlDeviceGet*RunningProcesses: with *infoCount too small (0 and infos NULL, say)
 * set *infoCount to the number needed and return NVML_ERROR_INSUFFICIENT_SIZE, or NVML_SUCCESS when there
 * are none. On success *infoCount is the number filled in. v1 fills nvmlProcessInfo_v1_t, else _v2_t. */
static nvmlReturn_t procs_common(nvmlDevice_t device, int graphics, unsigned int *infoCount, void *infos, int v1)
{
    const fake_device *d;
    unsigned int index, i, n = 0;
    nvmlReturn_t rc = begin_device(device, &d, &index);
    if (rc != NVML_SUCCESS)
        return rc;
    if (infoCount == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (d->procs_ret != 0)
        return (nvmlReturn_t)d->procs_ret;
    for (i = 0; i < g_state.nproc; i++)
        if (g_state.proc[i].gpu == index && g_state.proc[i].graphics == graphics)
            n++;
    if (*infoCount < n) {
        *infoCount = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (n > 0 && infos == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    n = 0;
    for (i = 0; i < g_state.nproc; i++) {
        const fake_proc *p = &g_state.proc[i];
        if (p->gpu != index || p->graphics != graphics)
            continue;
        if (v1) {
            nvmlProcessInfo_v1_t *out = (nvmlProcessInfo_v1_t *)infos + n;
            memset(out, 0, sizeof *out);
            out->pid = p->pid;
            out->usedGpuMemory = p->used;
        } else {
            nvmlProcessInfo_v2_t *out = (nvmlProcessInfo_v2_t *)infos + n;
            memset(out, 0, sizeof *out);
            out->pid = p->pid;
            out->usedGpuMemory = p->used;
            out->gpuInstanceId = FAKE_NO_INSTANCE;
            out->computeInstanceId = FAKE_NO_INSTANCE;
        }
        n++;
    }
    *infoCount = n;
    return NVML_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Exported NVML functions                                                                                      */

#ifndef OMIT_fakeNvmlBuildInfo
/* Not NVML: which types the build used ("header=nvml.h api=12" or "header=own-types"). */
const char *fakeNvmlBuildInfo(void);
const char *fakeNvmlBuildInfo(void)
{
    return FAKE_NVML_BUILD_INFO;
}
#endif

#ifndef OMIT_nvmlInit
nvmlReturn_t nvmlInit(void)
{
    return init_common();
}
#endif

#ifndef OMIT_nvmlInit_v2
nvmlReturn_t nvmlInit_v2(void)
{
    return init_common();
}
#endif

#ifndef OMIT_nvmlInitWithFlags
nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    return init_common();
}
#endif

#ifndef OMIT_nvmlShutdown
nvmlReturn_t nvmlShutdown(void)
{
    if (g_init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    g_init_count--;
    return NVML_SUCCESS;
}
#endif

#ifndef OMIT_nvmlErrorString
const char *nvmlErrorString(nvmlReturn_t result)
{
    switch ((int)result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_ALREADY_INITIALIZED: return "Already Initialized";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_INSUFFICIENT_POWER: return "Insufficient External Power";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_IRQ_ISSUE: return "Interrupt Request Issue";
    case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_CORRUPTED_INFOROM: return "Corrupted infoROM";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
    case NVML_ERROR_OPERATING_SYSTEM: return "The operating system has blocked the request.";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
    case NVML_ERROR_IN_USE: return "In use by another client";
    case NVML_ERROR_MEMORY: return "Insufficient Memory";
    case NVML_ERROR_NO_DATA: return "No data";
    case NVML_ERROR_INSUFFICIENT_RESOURCES: return "Insufficient resources";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    case NVML_ERROR_DEPRECATED: return "Deprecated";
    case NVML_ERROR_NOT_READY: return "Not ready";
    case NVML_ERROR_GPU_NOT_FOUND: return "GPU not found";
    case NVML_ERROR_INVALID_STATE: return "Invalid state";
    default: return "Unknown Error";
    }
}
#endif

#ifndef OMIT_nvmlSystemGetDriverVersion
nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    nvmlReturn_t rc = begin();
    if (rc != NVML_SUCCESS)
        return rc;
    return copy_text(g_state.driver, version, length);
}
#endif

#ifndef OMIT_nvmlDeviceGetCount
nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    return count_common(deviceCount);
}
#endif

#ifndef OMIT_nvmlDeviceGetCount_v2
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    return count_common(deviceCount);
}
#endif

#ifndef OMIT_nvmlDeviceGetHandleByIndex
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return handle_common(index, device);
}
#endif

#ifndef OMIT_nvmlDeviceGetHandleByIndex_v2
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    return handle_common(index, device);
}
#endif

#ifndef OMIT_nvmlDeviceGetIndex
nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    const fake_device *d;
    unsigned int i;
    nvmlReturn_t rc = begin_device(device, &d, &i);
    if (rc != NVML_SUCCESS)
        return rc;
    if (index == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *index = i;
    return NVML_SUCCESS;
}
#endif

#ifndef OMIT_nvmlDeviceGetName
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    const fake_device *d;
    nvmlReturn_t rc = begin_device(device, &d, NULL);
    if (rc != NVML_SUCCESS)
        return rc;
    return copy_text(d->name, name, length);
}
#endif

#ifndef OMIT_nvmlDeviceGetUUID
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    const fake_device *d;
    nvmlReturn_t rc = begin_device(device, &d, NULL);
    if (rc != NVML_SUCCESS)
        return rc;
    return copy_text(d->uuid, uuid, length);
}
#endif

#ifndef OMIT_nvmlDeviceGetMemoryInfo
/* v1: `used` includes the reserved memory, as R510+ drivers report it; free = total - used - reserved. */
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    const fake_device *d;
    nvmlReturn_t rc = begin_device(device, &d, NULL);
    if (rc != NVML_SUCCESS)
        return rc;
    if (memory == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (d->mem_ret != 0)
        return (nvmlReturn_t)d->mem_ret;
    memory->total = d->total;
    memory->used = d->used + d->reserved;
    memory->free = d->total - d->used - d->reserved;
    return NVML_SUCCESS;
}
#endif

#ifndef OMIT_nvmlDeviceGetMemoryInfo_v2
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    const fake_device *d;
    nvmlReturn_t rc = begin_device(device, &d, NULL);
    if (rc != NVML_SUCCESS)
        return rc;
    if (memory == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != nvmlMemory_v2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (d->mem_v2_ret != 0)
        return (nvmlReturn_t)d->mem_v2_ret;
    memory->total = d->total;
    memory->reserved = d->reserved;
    memory->used = d->used;
    memory->free = d->total - d->used - d->reserved;
    return NVML_SUCCESS;
}
#endif

#ifndef OMIT_nvmlDeviceGetTemperature
nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensorType, unsigned int *temp)
{
    const fake_device *d;
    nvmlReturn_t rc = begin_device(device, &d, NULL);
    if (rc != NVML_SUCCESS)
        return rc;
    if (temp == NULL || (unsigned int)sensorType != NVML_TEMPERATURE_GPU)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (d->temp_ret != 0)
        return (nvmlReturn_t)d->temp_ret;
    *temp = (unsigned int)d->temp;
    return NVML_SUCCESS;
}
#endif

#ifndef OMIT_nvmlDeviceGetTemperatureV
nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t device, nvmlTemperature_t *temperature)
{
    const fake_device *d;
    nvmlReturn_t rc = begin_device(device, &d, NULL);
    if (rc != NVML_SUCCESS)
        return rc;
    if (temperature == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (temperature->version != nvmlTemperature_v1)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if ((unsigned int)temperature->sensorType != NVML_TEMPERATURE_GPU)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (d->temp_ret != 0)
        return (nvmlReturn_t)d->temp_ret;
    temperature->temperature = (int)d->temp;
    return NVML_SUCCESS;
}
#endif

#ifndef OMIT_nvmlDeviceGetTemperatureThreshold
nvmlReturn_t nvmlDeviceGetTemperatureThreshold(nvmlDevice_t device, nvmlTemperatureThresholds_t thresholdType,
                                               unsigned int *temp)
{
    const fake_device *d;
    long long value;
    nvmlReturn_t rc = begin_device(device, &d, NULL);
    if (rc != NVML_SUCCESS)
        return rc;
    if (temp == NULL || (unsigned int)thresholdType >= (unsigned int)NVML_TEMPERATURE_THRESHOLD_COUNT)
        return NVML_ERROR_INVALID_ARGUMENT;
    if ((unsigned int)thresholdType == NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
        value = d->slowdown;
    else if ((unsigned int)thresholdType == NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)
        value = d->shutdown;
    else
        value = -1;
    if (value < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    *temp = (unsigned int)value;
    return NVML_SUCCESS;
}
#endif

#ifndef OMIT_nvmlDeviceGetComputeRunningProcesses
/* The legacy unversioned symbol: nvmlProcessInfo_v1_t (pid, usedGpuMemory). pynvml never calls it. */
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device, unsigned int *infoCount,
                                                  nvmlProcessInfo_v1_t *infos)
{
    return procs_common(device, 0, infoCount, infos, 1);
}
#endif

#ifndef OMIT_nvmlDeviceGetComputeRunningProcesses_v2
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_v2_t *infos)
{
    return procs_common(device, 0, infoCount, infos, 0);
}
#endif

#ifndef OMIT_nvmlDeviceGetComputeRunningProcesses_v3
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos)
{
    return procs_common(device, 0, infoCount, infos, 0);
}
#endif

#ifndef OMIT_nvmlDeviceGetGraphicsRunningProcesses
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses(nvmlDevice_t device, unsigned int *infoCount,
                                                   nvmlProcessInfo_v1_t *infos)
{
    return procs_common(device, 1, infoCount, infos, 1);
}
#endif

#ifndef OMIT_nvmlDeviceGetGraphicsRunningProcesses_v2
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(nvmlDevice_t device, unsigned int *infoCount,
                                                      nvmlProcessInfo_v2_t *infos)
{
    return procs_common(device, 1, infoCount, infos, 0);
}
#endif

#ifndef OMIT_nvmlDeviceGetGraphicsRunningProcesses_v3
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                      nvmlProcessInfo_t *infos)
{
    return procs_common(device, 1, infoCount, infos, 0);
}
#endif

#ifndef OMIT_nvmlDeviceGetMigMode
nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode, unsigned int *pendingMode)
{
    const fake_device *d;
    nvmlReturn_t rc = begin_device(device, &d, NULL);
    if (rc != NVML_SUCCESS)
        return rc;
    if (currentMode == NULL || pendingMode == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (d->mig < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    *currentMode = (unsigned int)d->mig;
    *pendingMode = (unsigned int)d->mig;
    return NVML_SUCCESS;
}
#endif

/* The clock-event reasons, under the name R535+ drivers export and under the old one, which they keep. */
static nvmlReturn_t clocks_common(nvmlDevice_t device, unsigned long long *reasons)
{
    const fake_device *d;
    nvmlReturn_t rc = begin_device(device, &d, NULL);
    if (rc != NVML_SUCCESS)
        return rc;
    if (reasons == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (d->clocks_ret != 0)
        return (nvmlReturn_t)d->clocks_ret;
    *reasons = d->clocks;
    return NVML_SUCCESS;
}

#ifndef OMIT_nvmlDeviceGetCurrentClocksEventReasons
nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device, unsigned long long *clocksEventReasons)
{
    return clocks_common(device, clocksEventReasons);
}
#endif

#ifndef OMIT_nvmlDeviceGetCurrentClocksThrottleReasons
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device, unsigned long long *clocksThrottleReasons)
{
    return clocks_common(device, clocksThrottleReasons);
}
#endif
