"""Arduino boards `keras-patch export-arduino` can size a sketch for.

Each `Board` holds the two limits the Arduino build itself checks
(`upload.maximum_size`, flash for the sketch, and
`upload.maximum_data_size`, RAM for globals such as the tensor arena) plus an
estimate of what the board's core uses of each before any model is added.

Sources:

* Flash and RAM limits of the mbed boards (Nano 33 BLE / BLE Sense, Nicla
  Vision, Portenta H7, Nano RP2040 Connect, Raspberry Pi Pico): `boards.txt`
  of arduino/ArduinoCore-mbed (keys `<board>.upload.maximum_size` and
  `<board>.upload.maximum_data_size`). The Portenta H7 value is the default
  "1MB M7 + 1MB M4" flash split.
* Chips: nRF52840 (Nordic product specification: 1 MB flash, 256 KB RAM),
  STM32H747 (ST datasheet: 2 MB flash, 1 MB RAM; the mbed core gives a
  sketch 523,624 B of it), RP2040 (Raspberry Pi datasheet: 264 KB SRAM,
  external QSPI flash), ESP32-S3 (Espressif datasheet: 512 KB SRAM).
* ESP32-S3 (arduino-esp32 core): 327,680 B `maximum_data_size` as in the
  esp32s3 board entries of arduino-esp32's `boards.txt` (checked on one
  ESP32-S3 board entry); 1,310,720 B is the application partition of the
  default 4 MB partition scheme (not re-checked here). PSRAM, when present,
  is not counted.
* `core_flash_bytes` / `core_ram_bytes` are ESTIMATES (not measured by this
  repository) of an empty sketch on that core: the mbed OS cores link about
  80-100 kB of code and reserve RAM for the RTOS, USB serial and heap; they
  are deliberately generous so that a model that "fits" also links.

Example:

>>> from keras_patch.arduino.boards import get_board
>>> board = get_board("nano33ble")
>>> board.fqbn, board.flash_bytes, board.ram_bytes
('arduino:mbed_nano:nano33ble', 983040, 262144)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from keras_patch.errors import KerasPatchError


@dataclass(frozen=True)
class Board:
    """Flash and RAM budget of one Arduino board.

    Attributes:
        key: the `--board` name.
        name: human-readable board name.
        fqbn: the fully qualified board name for `arduino-cli compile -b`.
        mcu: the microcontroller.
        cpu: the core (`cortex-m4`, ...), for messages and compiler flags.
        flash_bytes: flash available to a sketch (`upload.maximum_size`).
        ram_bytes: RAM available to a sketch's globals (`upload.maximum_data_size`).
        core_flash_bytes: estimate of the board core's own code in a sketch.
        core_ram_bytes: estimate of RAM the core needs (its globals, stacks,
            heap) next to the tensor arena.
    """

    key: str
    name: str
    fqbn: str
    mcu: str
    cpu: str
    flash_bytes: int
    ram_bytes: int
    core_flash_bytes: int
    core_ram_bytes: int

    @property
    def arena_budget_bytes(self) -> int:
        """RAM left for the tensor arena: `ram_bytes - core_ram_bytes`."""
        return self.ram_bytes - self.core_ram_bytes

    @property
    def model_flash_budget_bytes(self) -> int:
        """Flash left for TFLM, the kernels and the model: `flash_bytes - core_flash_bytes`."""
        return self.flash_bytes - self.core_flash_bytes


_KIB = 1024

BOARDS: Dict[str, Board] = {
    b.key: b
    for b in (
        Board("nano33ble", "Arduino Nano 33 BLE / BLE Sense", "arduino:mbed_nano:nano33ble",
              "nRF52840", "cortex-m4", 983040, 262144, 100 * _KIB, 48 * _KIB),
        Board("nicla_vision", "Arduino Nicla Vision", "arduino:mbed_nicla:nicla_vision",
              "STM32H747AII6", "cortex-m7", 1966080, 523624, 120 * _KIB, 64 * _KIB),
        Board("portenta_h7", "Arduino Portenta H7 (M7 core, 1MB+1MB flash split)",
              "arduino:mbed_portenta:envie_m7", "STM32H747XI", "cortex-m7", 786432, 523624,
              120 * _KIB, 64 * _KIB),
        Board("nano_rp2040_connect", "Arduino Nano RP2040 Connect",
              "arduino:mbed_rp2040:nanorp2040connect", "RP2040", "cortex-m0plus",
              16777216, 270336, 100 * _KIB, 48 * _KIB),
        Board("pico", "Raspberry Pi Pico (Arduino mbed core)", "arduino:mbed_rp2040:pico",
              "RP2040", "cortex-m0plus", 2097152, 270336, 100 * _KIB, 48 * _KIB),
        Board("esp32s3", "ESP32-S3 (arduino-esp32, default partitions, no PSRAM)",
              "esp32:esp32:esp32s3", "ESP32-S3", "xtensa-lx7", 1310720, 327680,
              260 * _KIB, 64 * _KIB),
    )
}


def get_board(key: str) -> Board:
    """The `Board` called `key` (see `BOARDS`).

    Raises:
        KerasPatchError: unknown board; the message lists the known ones.
    """
    try:
        return BOARDS[key]
    except KeyError:
        raise KerasPatchError(
            f"--board '{key}': unknown board; choose one of {', '.join(sorted(BOARDS))}."
        ) from None
