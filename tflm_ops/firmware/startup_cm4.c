/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

Minimal Cortex-M4F start-up for QEMU's mps2-an386 board: vector table,
FPU enable, .data copy and .bss clear, newlib semihosting (rdimon) set-up,
then exit(main()). Under `-semihosting-config enable=on,target=native` the
QEMU process exits with main's return value. A fault exits with status 3.
==============================================================================*/
#include <stdint.h>
#include <stdlib.h>

extern uint32_t __stack_top, __data_load, __data_start, __data_end, __bss_start, __bss_end;
extern int main(void);
extern void initialise_monitor_handles(void);
extern void __libc_init_array(void);

void Reset_Handler(void) {
  volatile uint32_t* cpacr = (volatile uint32_t*)0xE000ED88u;
  *cpacr |= (0xFu << 20); /* CP10, CP11: full access to the FPU */
  __asm volatile("dsb\n isb");
  const uint32_t* src = &__data_load;
  for (uint32_t* dst = &__data_start; dst < &__data_end;) *dst++ = *src++;
  for (uint32_t* dst = &__bss_start; dst < &__bss_end;) *dst++ = 0;
  initialise_monitor_handles();
  __libc_init_array();
  exit(main());
}

void Fault_Handler(void) { exit(3); }

/* newlib's __libc_init_array calls these; the C++ constructors run from .init_array. */
void _init(void) {}
void _fini(void) {}

__attribute__((section(".isr_vector"), used)) void (*const kVectors[16])(void) = {
    (void (*)(void))(&__stack_top), Reset_Handler, Fault_Handler, Fault_Handler,
    Fault_Handler, Fault_Handler, Fault_Handler,
};
