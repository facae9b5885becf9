// Host stand-in for the parts of the Arduino core the keras-patch example
// sketches use (Serial, millis/micros/delay, pinMode/digitalWrite and the
// Nano 33 BLE's LED pins), so that a generated sketch can be linked against
// a host TFLM library and run. Our own code, not the Arduino core's.
#ifndef KERAS_PATCH_TESTS_ARDUINO_SHIM_ARDUINO_H_
#define KERAS_PATCH_TESTS_ARDUINO_SHIM_ARDUINO_H_

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define HIGH 1
#define LOW 0
#define OUTPUT 1
#define LEDR (22u)
#define LEDG (23u)
#define LEDB (24u)
#define LED_BUILTIN (13u)

unsigned long millis();
unsigned long micros();
void delay(unsigned long ms);
void pinMode(unsigned int pin, int mode);
void digitalWrite(unsigned int pin, int value);

class SerialShim {
 public:
  void begin(unsigned long baud);
  explicit operator bool() const { return true; }
  void print(const char* s);
  void print(char c);
  void print(int v);
  void print(unsigned int v);
  void print(long v);
  void print(unsigned long v);
  void print(double v, int digits = 2);
  void println();
  template <typename T>
  void println(T v) {
    print(v);
    println();
  }
  template <typename T>
  void println(T v, int digits) {
    print(v, digits);
    println();
  }
};
extern SerialShim Serial;

#endif  // KERAS_PATCH_TESTS_ARDUINO_SHIM_ARDUINO_H_
