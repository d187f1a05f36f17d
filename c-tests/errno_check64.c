#define _FILE_OFFSET_BITS 64
#include "errno_check.c"
