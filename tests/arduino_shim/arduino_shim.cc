// Host implementation of the Arduino shim (Arduino.h, Arduino_OV767X.h) and
// main(): setup(), then loop() $KP_SHIM_LOOPS times (default 1), printing the
// RGB LED state after each loop. A sketch that halts (delay() for more than
// 60 s of simulated time) ends the program with exit code 3. Builds for the
// host and, with newlib + semihosting (rdimon), for a bare-metal Cortex-M.
// Our own code.
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "Arduino.h"
#include "Arduino_OV767X.h"

void setup();
void loop();

SerialShim Serial;
OV767X Camera;

namespace {

const clock_t kStart = clock();
unsigned long delayed_ms = 0;
int pins[64];
bool led_written = false;

}  // namespace

// Processor time (host), or semihosting SYS_CLOCK (10 ms steps) on a bare-metal target.
unsigned long micros() {
  return static_cast<unsigned long>(static_cast<double>(clock() - kStart) * 1e6 / CLOCKS_PER_SEC);
}
unsigned long millis() { return delayed_ms + micros() / 1000; }
void delay(unsigned long ms) {
  delayed_ms += ms;
  if (delayed_ms > 60000) {
    fflush(stdout);
    fprintf(stderr, "[shim] the sketch halted\n");
    exit(3);
  }
}
void pinMode(unsigned int, int) {}
void digitalWrite(unsigned int pin, int value) {
  if (pin < 64) pins[pin] = value;
  led_written = led_written || pin == LEDR || pin == LEDG || pin == LEDB;
}

void SerialShim::begin(unsigned long) {}
void SerialShim::print(const char* s) { fputs(s, stdout); }
void SerialShim::print(char c) { fputc(c, stdout); }
void SerialShim::print(int v) { printf("%d", v); }
void SerialShim::print(unsigned int v) { printf("%u", v); }
void SerialShim::print(long v) { printf("%ld", v); }
void SerialShim::print(unsigned long v) { printf("%lu", v); }
void SerialShim::print(double v, int digits) { printf("%.*f", digits, v); }
void SerialShim::println() { fputs("\r\n", stdout); }

int OV767X::begin(int resolution, int format, int, int) {
  if (resolution != QCIF || format != GRAYSCALE) return 0;
  width_ = 176;
  height_ = 144;
  bytes_per_pixel_ = 1;
  return 1;
}

void OV767X::readFrame(void* buffer) {
  uint8_t* out = static_cast<uint8_t*>(buffer);
  const size_t size = static_cast<size_t>(width_) * height_;
  const char* path = getenv("KP_SHIM_FRAME");
#ifdef KP_SHIM_FRAME_PATH  // no environment on bare metal: -DKP_SHIM_FRAME_PATH='"/abs/frame.bin"'
  if (path == nullptr) path = KP_SHIM_FRAME_PATH;
#endif
  if (path == nullptr) {
    for (size_t i = 0; i < size; ++i) out[i] = static_cast<uint8_t>(i % width_);
    return;
  }
  FILE* f = fopen(path, "rb");
  if (f == nullptr || fread(out, 1, size, f) != size) {
    fprintf(stderr, "[shim] cannot read %zu bytes from %s\n", size, path);
    exit(4);
  }
  fclose(f);
}

int main() {
  const char* loops_env = getenv("KP_SHIM_LOOPS");
#ifndef KP_SHIM_DEFAULT_LOOPS
#define KP_SHIM_DEFAULT_LOOPS 1
#endif
  const int loops = loops_env ? atoi(loops_env) : KP_SHIM_DEFAULT_LOOPS;
  setup();
  for (int i = 0; i < loops; ++i) {
    loop();
    if (!led_written) continue;
    printf("[shim] LED R=%s G=%s B=%s\n", pins[LEDR] == LOW ? "on" : "off", pins[LEDG] == LOW ? "on" : "off",
           pins[LEDB] == LOW ? "on" : "off");
  }
  fflush(stdout);
  return 0;
}
