// The Cairn Android library: Kotlin facade + JNI surface; the native libraries come from
// ../build-native.sh (cargo ndk) into src/main/jniLibs/<abi>/libcairn_jni.so.
plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "ai.cairn"
    compileSdk = 34
    defaultConfig {
        minSdk = 24
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
    // The host test runs on a desktop JDK against a Linux build of the glue
    // (android/jni/tests/java.rs); it is not an Android unit test.
    sourceSets["test"].java.srcDirs(emptyList<String>())
}

dependencies {
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.8.1")
}
