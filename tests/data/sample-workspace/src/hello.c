#include <stdio.h>

int main(void) {
    printf("hello from /workspace\n");
    return 0;
}
